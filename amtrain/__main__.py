from amtrain.cli import main

main()
