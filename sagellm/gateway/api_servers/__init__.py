"""API servers: processes in front of a gateway's serving core (`sagellm serve --api-servers N`, or `sagellm
api-server` on another host). `link` is what they and the core say over ZeroMQ, `server` the API server process,
`hub` the core's end of them."""
