"""A whole slide in tiles: the tissue mask, the tile grid, stitching, the resume journal and the run itself."""
