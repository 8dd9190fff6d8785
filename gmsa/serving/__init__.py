"""The HTTP server (``gmsa serve``, the ``[serve]`` extra): app and routes, the service behind them, its errors,
the compressed-context store, schemas, request guards, the micro-batching model worker and metrics."""
