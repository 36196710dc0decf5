from stagewise.objectives.causal_lm import (IGNORE_INDEX, OBJECTIVES, Batch, ObjectiveOutput,
                                            causal_lm_loss, num_targets)

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "Batch", "ObjectiveOutput", "causal_lm_loss", "num_targets"]
