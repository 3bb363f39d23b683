"""Neural network models: PDAM (the paper's domain-adaptive Mask R-CNN) and its parts."""
