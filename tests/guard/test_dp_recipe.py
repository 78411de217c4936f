"""guard.dp.DP_RECIPE: DP-SGD's own settings, sized to the data."""
from __future__ import annotations

from guard import dp


def test_recipe_batch_is_a_fixed_share_of_the_data_within_bounds():
    recipe = dp.DPRecipe(sample_rate=0.1, min_batch_size=16)
    assert recipe.batch_size(898) == 90 and recipe.batch_size(100_000) == 10_000
    assert recipe.batch_size(50) == 16 and recipe.batch_size(10) == 9  # never the whole data set
    assert dp.DP_RECIPE.options(898) == {"batch_size": 225, "epochs": dp.DP_RECIPE.epochs,
                                         "lr": dp.DP_RECIPE.lr, "max_grad_norm": dp.DP_RECIPE.max_grad_norm,
                                         "average": dp.DP_RECIPE.average}
