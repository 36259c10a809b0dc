"""Clusters for real on one machine: hosts as network namespaces with sshd, Slurm, the images (issue 18)."""
