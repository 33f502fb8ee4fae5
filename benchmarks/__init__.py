"""Benchmarks of sageLLM against peer engines on the workloads of BENCHMARKS.md (`sagellm bench ...`)."""
