"""OpenAI's Files and Batch APIs: files kept under the state directory, batches of requests run through the
gateway's own routes at the low priority class, resumed after a restart."""
