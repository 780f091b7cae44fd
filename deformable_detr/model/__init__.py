"""The Deformable DETR model: backbone, transformer, heads, post-processing, and the builder."""
