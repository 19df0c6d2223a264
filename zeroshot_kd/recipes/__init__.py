"""Training *procedures* built on the one KD loop (:func:`zeroshot_kd.training.train_student`), not new losses.

- :mod:`.chain`: teacher-assistant chains (TAKD, Mirzadeh et al. 2020) and IFM's auxiliary network (Passalis et
  al. 2020): teacher -> assistant(s) -> student, one ``zkd distill`` stage each.
- :mod:`.active_mixup`: Active Mixup (Wang et al. 2020): a few unlabeled images, a black-box teacher that only
  answers queries, and rounds of the mixup images the student is least sure of.

See docs/recipes.md.
"""

from .active_mixup import BlackBoxAccessError, BlackBoxTeacher, MixupSelection, active_mixup, select_mixup
from .chain import ChainStage, chain_plan, distill_chain, wider_spec

__all__ = ["BlackBoxAccessError", "BlackBoxTeacher", "ChainStage", "MixupSelection", "active_mixup", "chain_plan",
           "distill_chain", "select_mixup", "wider_spec"]
