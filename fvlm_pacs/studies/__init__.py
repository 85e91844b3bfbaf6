"""Study-level stages: deciding a study is complete, and turning its best series into a volume."""
