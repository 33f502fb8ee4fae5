"""Graph executors: trio tasks in one process (`local`), or nodes in their own processes over ZeroMQ (`process`)."""
