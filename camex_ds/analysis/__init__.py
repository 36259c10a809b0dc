"""Measuring and comparing runs: FLOPs and parameters (`flops`), hardware peaks (`hardware`), paired statistics
over seeds (`stats`), a compare grid and its FLOPs budget (`grid`), running it (`supervise`) and its report."""
