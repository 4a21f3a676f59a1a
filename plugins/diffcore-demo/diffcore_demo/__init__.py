"""diffcore's bundled demo model (alias ``demo``): coloured circles, squares and triangles from a caption."""
