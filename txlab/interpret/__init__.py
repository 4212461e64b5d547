"""Looking inside a trained model: attention distances per layer (`txlab attention`)."""
