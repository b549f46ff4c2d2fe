from neuroplex.cli import main

main()
