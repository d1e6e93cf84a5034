"""Attribution graphs and what is done with them: build, prune, score, intervene, group, label, export, draw."""
