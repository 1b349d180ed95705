"""Job, defense and attack tables parsed once into types at the boundary; nothing above re-parses strings."""
