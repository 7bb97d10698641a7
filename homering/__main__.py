from homering.cli import main

main()
