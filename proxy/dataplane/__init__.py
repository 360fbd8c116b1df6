"""One worker process: listeners, HTTP/1.1 connections and their exchanges, upstream pools,
shadow traffic, the access log and write batching (`python -m proxy.dataplane.worker`)."""
