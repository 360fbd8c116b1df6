"""What both processes use: the supervisor-worker channel and its messages, TLS contexts and
certificate files, and the task set that keeps strong references to background tasks."""
