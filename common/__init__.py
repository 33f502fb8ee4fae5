"""The ground floor (`sagellm.common`): what every other floor may use and which uses nothing of sageLLM.

- `home`: where sageLLM keeps files on this machine ($SAGELLM_HOME).
- `logging`: structlog set-up for the processes a user starts (CLI, workers, servers).
- `openmp`: the OpenMP wait policy those processes set before torch loads.
- `registry`: name -> class registries (operators, policies, routing strategies, backends).
- `errors`, `hints`: `FieldError` and type-hint checks for settings written by hand.
- `nursery_errors`: a trio nursery's lone failure raised as itself; the failures the code named.
- `processes`: how sageLLM starts a Python process of its own; whether a process runs.
- `parent_death`: a child of ours that ends with the process that started it.
- `pulse`: a wake-up for "something changed, look again", re-armed at each fire."""
