"""Serving: the dynamic batcher (`batcher`), the HTTP app (`app`), its guard (`guard`: size limits, slow
clients, API key), the one mapping of errors to HTTP (`http_errors`), metrics (`metrics`) and the uvicorn
runner with graceful shutdown (`runner`). The server's dependencies are the `[serve]` extra."""
