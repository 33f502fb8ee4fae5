"""Speculative decoding: a proposer guesses a sequence's next tokens, the target model checks them all in one forward
pass, and the ones it would have produced itself are kept (`config.py` the settings, `proposers.py` the guessers,
`verify.py` the check)."""
