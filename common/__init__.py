"""Shared plumbing for both workers: settings, wire formats, Kafka, Redis, metrics, tokenizer, images, model."""
