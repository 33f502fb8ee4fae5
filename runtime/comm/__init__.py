"""Inter-process communication of the pipeline: the wire format of items (`wire`) and ZeroMQ sockets driven from trio
tasks (`zmq_trio`), on which the process executor builds its edges, readiness handshake and heartbeats."""
