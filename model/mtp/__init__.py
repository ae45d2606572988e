"""Multi-token prediction objectives; one module each, all living in the output tail."""
