"""Text helpers shared by the stages and tools.

- `lexicon`: the one copy of the word lists (colours, numbers, positions, closed classes, -ing
  nouns, frequent verbs) that every module below reads;
- `morphology` (lemminflect lookups), `phrases` (word classes, the head noun without a parser);
- `positional`: positional words and the mosaic quadrants they allow;
- `class_extract`: the COCO category of an expression's head noun;
- `distractor_rules` and `distractor_edits`: rule-based text hard negatives and their validation;
- `normalise`, `negative_rules`: "the same text", and which texts may be a query's negative.
"""
