"""A discrete-event simulator of a serving cluster: many engine instances on a simulated clock, scheduled and routed
by the real policy, routing and PD-split code, each instance's steps timed by a `StepModel` measured on our engine."""
