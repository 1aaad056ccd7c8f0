"""Worker processes: pull jobs from task streams, run the shared encoder and heads, reply."""
