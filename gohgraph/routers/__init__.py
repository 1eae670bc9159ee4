"""Who goes where: head and expert routers (one GAT round shared by both), gates, routing losses."""
