"""The HTTP service: `tuneloop serve`, its guards (keys, limits), micro-batching and the prediction store."""
