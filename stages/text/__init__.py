"""Text helpers shared by the stages and tools: normalisation, word lists, parsing."""
