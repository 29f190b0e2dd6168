from latentdiff.cli import main

main()
