"""One thin entry point per DVC stage: read params, load inputs, call ``pipeline``, write outputs."""
