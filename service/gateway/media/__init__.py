"""Per-call media: jitter buffer to model frames, model frames through the pacer, resampling."""
