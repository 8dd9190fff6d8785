"""Parts of the HTTP server (``gmsa serve``): schemas, request guards, micro-batching worker, metrics."""
