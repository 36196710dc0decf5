from stagewise.eval.evaluate import evaluate

__all__ = ["evaluate"]
