"""Running a real ``tritonserver`` on this machine, no container or cluster."""
