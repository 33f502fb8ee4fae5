"""Multi-turn conversations the gateway keeps (`store`) and their routes, `/sessions/*` (`routes`)."""
