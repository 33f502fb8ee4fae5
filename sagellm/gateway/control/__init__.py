"""The control plane: what an engine of the gateway is (`engine_spec`), the engines it starts or reaches besides its
graph's own (`engines`), an engine of ours as a worker of the gateway's graph (`engine_link`), another project's
server it starts (`third_party`: the command line; `server_process`: the child it supervises), the health checks of
servers it reaches (`health`), the autoscaler, joining another gateway (`join`), and the routes that steer it all:
the management API (`management_routes`) and health, metrics and the admin routes (`admin_routes`)."""
