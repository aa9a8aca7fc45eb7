"""The suite's own setup under `make test` (pytest -n 2 --dist loadgroup): each xdist_group runs on
one worker, so a module's shared training (a module-scoped fixture) is made once, not on both."""

import pytest


@pytest.mark.xdist_group('suite_setup')
def test_loadgroup_keeps_each_group_on_one_worker(request):
  """pytest-xdist groups by suffixing node ids with '@group' on the workers; pytest 9.2's
  structured node ids drop that suffix silently (pytest-dev/pytest-xdist#1386) and the groups are
  then split over both workers. Without xdist (-n 0) there is nothing to group."""
  if not getattr(request.config.option, 'loadgroup', False):    # set on xdist workers
    return
  assert request.node.nodeid.endswith('@suite_setup'), (
      f'--dist loadgroup lost the xdist_group of {request.node.nodeid}: expected pytest < 9.2 '
      f'with pytest-xdist 3.8 (pyproject.toml test extra; pytest {pytest.__version__} here)')
