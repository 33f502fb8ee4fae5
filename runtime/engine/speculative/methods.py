"""The built-in proposers, each registered by its module: the engine makes its proposer here."""

from __future__ import annotations

from sagellm.runtime.engine.speculative.config import SpeculativeConfig
from sagellm.runtime.engine.speculative.draft_model import DraftModelProposer
from sagellm.runtime.engine.speculative.mtp import MtpProposer
from sagellm.runtime.engine.speculative.proposers import PROPOSERS, NgramProposer, Proposer, ProposerContext

BUILT_IN = (NgramProposer, DraftModelProposer, MtpProposer)


def make_proposer(config: SpeculativeConfig, context: ProposerContext) -> Proposer:
    return PROPOSERS.get(config.method)(config, context)
