"""vgf-prob: Value Gradient Flow."""
