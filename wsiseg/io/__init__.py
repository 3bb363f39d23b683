"""Reading slides and images: the reader facade, input expansion, the slide's scale."""
