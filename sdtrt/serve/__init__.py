"""Serving: the HTTP server (A1111 + OpenAI APIs), micro-batching, Ray Serve and Triton."""
