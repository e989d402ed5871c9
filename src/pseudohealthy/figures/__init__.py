"""PNG figures the project writes: restoration previews (:mod:`.preview`), the synthetic-task
gallery (:mod:`.gallery`) and PR/ROC curves (:mod:`.plots`)."""
