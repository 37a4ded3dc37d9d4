"""dprpipe: Dense Passage Retrieval as a reproducible pipeline (core retrieval logic)."""
