"""Placeholder: replaced by the head-training module."""
