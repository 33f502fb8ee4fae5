"""Benchmarks of sageLLM against peer engines on the workloads of benchmarks/README.md (`sagellm bench ...`)."""
