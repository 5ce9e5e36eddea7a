"""Training recipes (fastbert, deebert, joint, distil) sharing one training loop (``loop.train_loop``)."""

from model_store.training.recipes import RECIPES, Budget, RecipeResult, train_recipe

__all__ = ["RECIPES", "Budget", "RecipeResult", "train_recipe"]
