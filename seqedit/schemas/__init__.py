"""Pydantic models and Arrow schemas: the one source of truth for records and tables."""
