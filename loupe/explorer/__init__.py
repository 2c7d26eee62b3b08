"""`loupe view`: the explorer (bundle builder, loopback server, static pages, TensorBoard images)."""
