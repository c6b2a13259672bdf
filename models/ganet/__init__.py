"""GA-Net: a graph adapter over image-text sample nodes and class nodes."""
